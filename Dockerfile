# The image that deploy/kubernetes.yaml runs: `docker build -t petsage/petsage-grpc:0.1.0 .`
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY petsage_grpc ./petsage_grpc
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home petsage
USER 10001
EXPOSE 50051
ENTRYPOINT ["petsage-grpc"]
CMD ["serve"]
