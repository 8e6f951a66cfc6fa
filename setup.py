"""Packaging for twistedgw, the sandbox gateway daemon."""

from setuptools import find_packages, setup

CLIENT_REQUIRES = [
    "httpx>=0.27",
    "websockets>=13",
    "click>=8.1",
    "rich>=13",
]

setup(
    name="twistedgw",
    version="0.1.0",
    description="Sandbox gateway: Docker containers as sandboxes over REST and WebSocket",
    python_requires=">=3.11",
    # twisted.plugins is a namespace dropin directory (no __init__.py), listed explicitly.
    packages=[*find_packages(include=["twistedgw", "twistedgw.*"]), "twisted.plugins"],
    package_data={
        "twisted.plugins": ["sandboxgw_plugin.py"],
        # The browser console's own files and its npm pins; its node_modules (xterm.js) is
        # not packaged: `npm ci` in twistedgw/web/ui installs it (scripts/ensure-ui.sh).
        "twistedgw.web": ["ui/*.html", "ui/*.js", "ui/*.css", "ui/package*.json"],
    },
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
        # The client library (twistedgw.client) and the `twistedgw` CLI: asyncio, for users'
        # own programs (the gateway itself is Twisted and needs none of these).
        "client": CLIENT_REQUIRES,
        "test": [
            *CLIENT_REQUIRES,
            "pytest>=8",
            "pytest-twisted>=1.14",
            # Integration tests in parallel (tests/run.sh: -n, --dist loadfile).
            "pytest-xdist>=3.6,<4",
            "hypothesis>=6.100",
            "websockets>=13",
            "requests>=2.31",
            # The browser console's test drives Debian's chromium through its chromedriver.
            "selenium>=4.20",
            # Linters pinned to a minor release so a new rule cannot turn CI red by itself.
            "mypy>=2.4,<2.5",
            "mypy-zope>=1.0.17",
            "ruff>=0.17,<0.18",
            "types-requests",
            # The OpenAPI contract (issue 19): the document checked, and fuzzed against a
            # live gateway; pinned like the linters, so a release cannot move the goalposts.
            "openapi-spec-validator>=0.9,<0.10",
            "jsonschema>=4.23",
            "schemathesis>=4.32,<4.33",
            # Mutation testing (scripts/mutation.sh); not run by CI.
            "mutmut>=3.8,<3.9",
        ],
    },
    entry_points={"console_scripts": ["twistedgw = twistedgw.cli:main"]},
)
