"""blurflow: 3D flow and start depth from a single motion-blurred widefield microscopy image."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("blurflow")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"
