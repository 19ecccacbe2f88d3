"""Triton-free engine behind the Python-backend models of this repository (docs/INTERFACES.md).

Nothing here imports triton_python_backend_utils: the models' 1/model.py files are thin
adapters (Triton tensors in, Triton responses out) and the unit tests run the engine directly
(tests/test_decoder_engine.py). render.py deploys this package next to every model.py (in
``<model>/1/engine/``) because the backend stub only sees the model's own folder.

Modules (each small, one concern):
  bootstrap    sys.path for the stub's isolated Python (pylib_dir); imports nothing heavy
  config       config.pbtxt parameters, decoder settings
  session      ONE ONNX Runtime session helper for every model (providers, threads, spinning)
  layers       per-layer K/V graph inputs (rewrites decoder_step at load time)
  topk         top-k of many rows over a large vocabulary
  errors       RequestError: a problem with one request, with its Triton error code
  step_input   a decoding step: its inputs, validated
  state        per-sequence state
  pool         buffer pool for the KV-cache slabs
  kv_cache     self-attention cache slabs: gather (beam reorder by parent index) and append
  cross_store  cross-attention K/V rows of the live sequences (whisper)
  planner      how a (K, T) group of steps becomes decoder_step calls
  logit_rules  suppression and Whisper's timestamp rules
  scoring      log_softmax, top-k and extra-id log-probs of a step's logits
  runners/     one step runner per model family, registered in runners/__init__.py
  decoder      DecoderEngine: sequences, rounds, groups, runs, commit, eviction
  profile      opt-in timers (ASR_ENGINE_PROFILE_DIR) read by `make bench`

This file imports nothing: model.py imports ``engine.bootstrap`` before numpy is importable.
"""
