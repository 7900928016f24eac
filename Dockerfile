# The image that deploy/kubernetes.yaml runs: `docker build -t petsage/petsage-grpc:0.1.0 .`
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY petsage_grpc ./petsage_grpc
RUN pip install --no-cache-dir ".[all]" && useradd --uid 10001 --no-create-home petsage
USER 10001
# gRPC, the HTTP face (status page, /readyz, /metrics), the probe listener: as in the manifest.
EXPOSE 50051 8080 8081
ENTRYPOINT ["petsage-grpc"]
CMD ["serve"]
