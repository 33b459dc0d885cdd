"""Coverage-guided fuzzing of the vhost-user codec + state machine with
atheris (libFuzzer for Python), against the real device handler and data
plane.  Not part of the test suite: run it with fuzz/run.sh.

The target is harness.one_input.  A crash (any exception other than
ProtocolError, or a fault in C) is saved by libFuzzer as crash-<hash>: add it
to fuzz/corpus/protocol/ and to a regression test.
"""

import logging
import sys

import atheris

with atheris.instrument_imports():
    import harness

logging.disable(logging.CRITICAL)


if __name__ == "__main__":
    atheris.Setup(sys.argv, harness.one_input)
    atheris.Fuzz()
