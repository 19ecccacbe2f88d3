# The stateless gRPC gateway. Build: docker compose build gateway
FROM python:3.11-slim
WORKDIR /app
COPY requirements-gateway.txt .
RUN pip install --no-cache-dir -r requirements-gateway.txt
COPY protos/ protos/
COPY gateway/ gateway/
RUN python -m gateway.protocol
EXPOSE 50051
ENTRYPOINT ["python", "-m", "gateway.service.server"]
