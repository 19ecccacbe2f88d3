# The stateless gRPC gateway. Build: docker compose build gateway
FROM python:3.11-slim
WORKDIR /app
COPY requirements-gateway.txt requirements-analysis.txt ./
RUN pip install --no-cache-dir -r requirements-gateway.txt -r requirements-analysis.txt
COPY protos/ protos/
COPY gateway/ gateway/
# ticket analysis (AnalyzeTicket, CorrectTicket, Transcribe with analyze): code and configuration;
# the trained model is a build output, mounted (docker-compose.yml: ./build/analysis)
COPY analysis/ analysis/
RUN python -m gateway.protocol
# not root (deploy/k8s/gateway.yaml runs it as uid 10001 too)
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin asr
USER 10001
# 50051 gRPC (published); 9464 /metrics with --metrics-port 9464 (not published)
EXPOSE 50051 9464
# binds 127.0.0.1 unless given --host=0.0.0.0 (docker-compose.yml and the k8s manifests do)
ENTRYPOINT ["python", "-m", "gateway.service.server"]
