# serve.py on one GPU: the OpenAI-compatible server, the engine in its own process.
#   docker build -t qwen3-engine .
#   docker run --gpus 1 -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface qwen3-engine --model Qwen/Qwen3-0.6B
# A CUDA build of PyTorch (with Triton) is the base; the engine adds only small pure-Python packages.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY *.py ./
EXPOSE 8000
# SIGTERM (docker stop, a rolling update) drains requests in flight for up to --shutdown-timeout seconds
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "serve.py", "--host", "0.0.0.0", "--port", "8000", "--shutdown-timeout", "30"]
CMD ["--model", "Qwen/Qwen3-0.6B"]
