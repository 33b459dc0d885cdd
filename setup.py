# The native data plane (and the load generator's ring loop, and the VMM's vCPU exit loop) is compiled by cffi at install time; cffi_modules is a
# setup() keyword that pyproject.toml cannot express.
from setuptools import setup

setup(cffi_modules=["vhostd/native/build.py:ffibuilder", "vhostd/native/build.py:loadgen_ffibuilder",
                     "vhostd/native/build.py:vcpu_ffibuilder"])
