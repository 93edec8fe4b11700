# CPU image with the same pinned environment as `make venv`, plus the EGL
# libraries MuJoCo needs for headless pixel rendering (MUJOCO_GL=egl).
# torch comes from PyTorch's CPU wheel index (no CUDA packages); for a GPU image
# pass another index, e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
#   docker build -t crl-dreamer .
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends \
        libegl1 libgl1 libglvnd0 libopengl0 libgles2 make \
    && rm -rf /var/lib/apt/lists/*

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0 \
    && pip install --no-cache-dir -r requirements.txt

COPY . .
ENV MUJOCO_GL=egl PYTHONUNBUFFERED=1
CMD ["python", "dreamer.py", "--configs", "small", "--task", "dmc_cartpole_balance"]
