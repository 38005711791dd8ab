"""pylvs: a Linux Virtual Server director in user space."""

__version__ = "0.1.0"
