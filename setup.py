"""Package layout only (everything else is in pyproject.toml).

The library lives in `libs/bitsmith` and the services in `services/`, a layout pyproject's static
tables cannot express for nested packages; the services install as `bitsmith_services`.
"""

from setuptools import find_packages, setup

setup(
    package_dir={"": "libs", "bitsmith_services": "services"},
    packages=find_packages("libs")
    + ["bitsmith_services"]
    + [f"bitsmith_services.{name}" for name in find_packages("services")],
)
