"""ttt-jax: one-minute video generation with test-time training, in JAX/Flax."""
from setuptools import find_packages, setup

# Ranges are the ones we test: jax 0.10.x on CPU here, 0.11.x on the GPU machines.
INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.12",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "einops>=0.8,<0.9",
    "ml_collections>=1.0,<2",
    "clu>=0.0.12",
    # clu writes TensorBoard files through TensorFlow; without it, through tensorboardX
    # (ttt_jax/writers.py), so that no TensorFlow enters the training process.
    "tensorboardX>=2.6",
    "absl-py>=2.1",
    "numpy>=1.26",
    "tqdm>=4.66",
    # Datasets: tfds builders written as array_record, read without TensorFlow.
    "tensorflow-datasets>=4.9.9,<5",
    "array-record>=0.8",
    # tfds 4.9.x needs it to build datasets; current etils no longer pulls it in.
    "importlib_resources>=6",
    "scipy>=1.11",  # toy_toons' metric labels connected components
    # mp4 in and out (sampling, datasets) and PNG contact sheets.
    "imageio-ffmpeg>=0.5",
    "pillow>=10",
    # Plots the toy job writes (per-segment persistence).
    "matplotlib>=3.8",
    # Converters read checkpoints without torch; the tokenizer needs sentencepiece.
    "safetensors>=0.4.5",
    "sentencepiece>=0.2",
]

EXTRAS = {
    # PyTorch parity checks (diffusers/transformers models with the same weights).
    # torch is pinned to the CPU build the dev/CI machines carry; an unpinned torch
    # pulls a multi-GB CUDA build.
    "torch": [
        "torch==2.13.0",
        "diffusers>=0.35,<0.43",
        "transformers>=4.50,<6",
        "accelerate>=1.0",
    ],
}
# Compiling for TPU slices ahead of time on any host (bench/aot_compile.py): the libtpu that
# this jax was released with, which jax[tpu] pins. Keep it equal to the installed jax.
EXTRAS["tpu"] = ["jax[tpu]==0.10.2"]
# nbclient, nbformat, ipykernel: tests/test_ablate.py executes notebooks/ablations.ipynb.
EXTRAS["test"] = sorted(
    set(EXTRAS["torch"] + ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10",
                           "ipykernel>=6.29"]))

setup(
    name="ttt_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["ttt_jax", "ttt_jax.*", "pallas_kernels",
                                    "pallas_kernels.*", "configs"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
