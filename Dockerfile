# CPU image with the same pinned environment as `make venv`, plus the EGL
# libraries MuJoCo needs for headless pixel rendering (MUJOCO_GL=egl).
# To avoid the large CUDA build of torch, pass the CPU wheel index:
#   docker build --build-arg TORCH_INDEX=<pytorch cpu wheel index url> -t crl-dreamer .
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends \
        libegl1 libgl1 libglvnd0 libopengl0 libgles2 make \
    && rm -rf /var/lib/apt/lists/*

ARG TORCH_INDEX=
WORKDIR /app
COPY requirements.txt .
RUN if [ -n "$TORCH_INDEX" ]; then pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0; fi \
    && pip install --no-cache-dir -r requirements.txt

COPY . .
ENV MUJOCO_GL=egl PYTHONUNBUFFERED=1
CMD ["python", "dreamer.py", "--configs", "small", "--task", "dmc_cartpole_balance"]
