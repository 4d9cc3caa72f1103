"""bitsmith: quantize large language models at cluster scale.

Importing this package is cheap on purpose: it loads no torch, transformers or grpc, starts no
thread and touches no network, so that the coordinator and the CLI start fast. Heavy modules are
imported by the functions that need them.
"""

__version__ = "0.1.0"
