from setuptools import find_packages, setup

setup(
    name="safe_layers",
    version="0.1.0",
    description="Drop-in Caffe Python layers and tools that keep training from dying of NaN and Inf",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["safe_layers", "safe_layers.*"]),
    python_requires=">=3.8",
    # numpy/pyyaml for the layers; the tools read datasets (lmdb, plyvel, h5py), draw
    # (matplotlib, Agg) and show progress on a terminal (tqdm).
    install_requires=["numpy", "pyyaml", "lmdb", "plyvel", "h5py", "tqdm", "matplotlib"],
    extras_require={
        # CuPy for the GPU path; pick the wheel matching the CUDA runtime (cupy-cuda12x, ...).
        "gpu": ["cupy"],
        "test": ["pytest"],
        # make demo: scikit-learn ships the 8x8 digits the demo turns into LMDBs.
        "demo": ["scikit-learn"],
    },
    entry_points={"console_scripts": ["safe-layers = safe_layers.tools.cli:entry_point"]},
)
