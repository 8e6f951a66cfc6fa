"""Packaging for twistedgw, the sandbox gateway daemon."""

from setuptools import find_packages, setup

setup(
    name="twistedgw",
    version="0.1.0",
    description="Sandbox gateway: Docker containers as sandboxes over REST and WebSocket",
    python_requires=">=3.11",
    # twisted.plugins is a namespace dropin directory (no __init__.py), listed explicitly.
    packages=[*find_packages(include=["twistedgw", "twistedgw.*"]), "twisted.plugins"],
    package_data={"twisted.plugins": ["sandboxgw_plugin.py"]},
    install_requires=[
        "Twisted>=24.7",
        "klein>=24.8",
        "autobahn>=24.4",
        "docker>=7.1",
        "treq>=24.9",
        "attrs>=23.2",
        "zope.interface>=6.0",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            # Integration tests in parallel (tests/run.sh: -n, --dist loadfile).
            "pytest-xdist>=3.6,<4",
            "hypothesis>=6.100",
            "websockets>=13",
            "requests>=2.31",
            # Linters pinned to a minor release so a new rule cannot turn CI red by itself.
            "mypy>=2.4,<2.5",
            "mypy-zope>=1.0.17",
            "ruff>=0.17,<0.18",
            "types-requests",
            # Mutation testing (scripts/mutation.sh); not run by CI.
            "mutmut>=3.8,<3.9",
        ],
    },
)
