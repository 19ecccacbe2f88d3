# NVIDIA's Triton with the packages our Python-backend models import.
# The ONNX Runtime GPU build gives the CUDA and TensorRT execution providers
# (select with the execution_provider parameter at `make export`).
FROM nvcr.io/nvidia/tritonserver:24.10-py3
RUN pip install --no-cache-dir "numpy<2" onnxruntime-gpu==1.20.1
