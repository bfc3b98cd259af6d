"""Packaging for gkcp.

The version lives in one place, ``gkcp/__init__.py`` (``__version__``); it is
read here as text so that building never imports gkcp (or gevent).
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.abspath(os.path.dirname(__file__))


def read(*parts):
    with open(os.path.join(HERE, *parts), encoding="utf-8") as f:
        return f.read()


def read_version():
    match = re.search(
        r"""^__version__\s*=\s*['"]([^'"]+)['"]""", read("gkcp", "__init__.py"), re.M
    )
    if not match:
        raise RuntimeError("__version__ not found in gkcp/__init__.py")
    return match.group(1)


def read_long_description():
    for name in ("README.md", "README.rst", "README"):
        if os.path.exists(os.path.join(HERE, name)):
            content_type = "text/markdown" if name.endswith(".md") else "text/x-rst"
            if name == "README":
                content_type = "text/plain"
            return read(name), content_type
    return "", "text/plain"


LONG_DESCRIPTION, LONG_DESCRIPTION_TYPE = read_long_description()

TEST_REQUIRES = [
    "pytest",
    "pytest-timeout",
    "psutil",
    "siokcp",
    "hypothesis",
    "cryptography>=41",
]
CRYPTO_REQUIRES = ["cryptography>=41"]

DEV_REQUIRES = TEST_REQUIRES + [
    "ruff",
    "mypy",
    "tox",
]

setup(
    name="gkcp",
    version=read_version(),
    description=(
        "A shadowsocks SIP003 plugin that carries TCP connections over KCP, "
        "written in Python on gevent."
    ),
    long_description=LONG_DESCRIPTION,
    long_description_content_type=LONG_DESCRIPTION_TYPE,
    author="the gkcp developers",
    # PEP 639 license expression (setuptools >= 77); replaces the
    # deprecated "License ::" classifier.
    license_expression="MIT",
    license_files=["LICENSE"],
    keywords="shadowsocks sip003 plugin kcp arq udp tunnel gevent",
    packages=find_packages(include=["gkcp*"]),
    include_package_data=False,
    package_data={"gkcp": ["py.typed"]},
    zip_safe=False,
    python_requires=">=3.9",
    install_requires=["gevent>=22"],
    extras_require={
        "test": TEST_REQUIRES,
        "crypto": CRYPTO_REQUIRES,
        "dev": DEV_REQUIRES,
    },
    entry_points={
        "console_scripts": [
            "gkcp=gkcp.cli:main",
            "gkcp-local=gkcp.cli:main_local",
            "gkcp-server=gkcp.cli:main_server",
        ],
    },
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Environment :: Console",
        "Intended Audience :: Developers",
        "Intended Audience :: System Administrators",
        "Operating System :: POSIX",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Programming Language :: Python :: Implementation :: CPython",
        "Topic :: Internet :: Proxy Servers",
        "Topic :: System :: Networking",
    ],
)
