"""Build hook of the epochlens-client distribution (metadata: pyproject.toml).

trainer_client/demo.py drives the whole stack (it imports services.*), so it belongs to the
server-side install and is left out of the light client's wheel.
"""

from setuptools import setup
from setuptools.command.build_py import build_py

SERVER_SIDE_MODULES = {("trainer_client", "demo")}


class ClientBuildPy(build_py):
    """build_py without the modules that need the server packages."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) not in SERVER_SIDE_MODULES]


setup(cmdclass={"build_py": ClientBuildPy})
