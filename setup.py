# The native data plane (and the load generator's ring loop, and the VMM's vCPU exit loop) is compiled by cffi at install time; cffi_modules is a
# setup() keyword that pyproject.toml cannot express.
from setuptools import setup

# data_files: the vhost-user.json descriptors (QEMU's back-end program conventions) go to
# <prefix>/share/qemu/vhost-user; libvirt reads /usr/share, /etc and ~/.config/qemu/vhost-user.
setup(cffi_modules=["vhostd/native/build.py:ffibuilder", "vhostd/native/build.py:loadgen_ffibuilder",
                    "vhostd/native/build.py:vcpu_ffibuilder"],
      data_files=[("share/qemu/vhost-user", ["config/vhost-user/50-vhostd-blk.json",
                                             "config/vhost-user/50-vhostd-net.json"])])
