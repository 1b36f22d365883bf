"""Packaging hook: ship the top-level ``devices/`` profiles inside the wheel as ``edgetune/_devices``.

Everything else is declared in pyproject.toml. In a checkout (or an editable install) the code
reads ``devices/`` directly (``edgetune/devices/profile.py::profiles_folder``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithDevices(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "edgetune" / "_devices"
        target.mkdir(parents=True, exist_ok=True)
        for profile in sorted((HERE / "devices").glob("*.toml")):
            self.copy_file(str(profile), str(target / profile.name))


setup(cmdclass={"build_py": BuildWithDevices})
