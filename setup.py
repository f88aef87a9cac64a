"""The one compiled part of augserve: a libjpeg-turbo region decoder (augserve/sources/_libjpeg_region.c).

Optional: where libjpeg's headers or a C compiler are missing (``apt install libjpeg-dev gcc`` on
Debian/Ubuntu), the build goes on without it and JPEG regions are decoded by nvImageCodec or OpenCV
(augserve.sources.region_decoder says which). Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "augserve.sources._libjpeg_region",
            sources=["augserve/sources/_libjpeg_region.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
