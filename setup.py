from setuptools import find_packages, setup

setup(
    name="circles",
    version="0.1.0",
    description="WebSocket gateway of the Circles ecosystem: JSON-RPC 2.0, secp256k1 auth, Redis workers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["circles", "circles.*"]) + ["twisted.plugins"],
    package_data={"circles": ["openrpc.json", "http/playground/*.*"]},
    entry_points={"console_scripts": ["circles = circles.client.cli:main"]},
    include_package_data=True,
    install_requires=[
        # circles/http/eager.py subclasses tcp.Server and reads its buffers and flags (see the tests
        # pinning the reviewed Twisted source), as circles/protocol.py does with Autobahn.
        "twisted[tls]>=26.10,<27",
        # circles/protocol.py trims a few of Autobahn's methods (see the tests pinning their source).
        "autobahn>=26.10,<27",
        "coincurve>=20",
        "txredisapi>=1.4.10",
        # txredisapi parses replies with hiredis when present; its pure-Python parser pauses
        # and resumes the socket for every bulk reply (a fifth of a worker's CPU under load).
        "hiredis>=2",
        "klein>=23.5",
        "service-identity>=23.1",
        "pyopenssl>=23.2",
        "cryptography>=41",
        "pycryptodome>=3.19",
        "attrs>=23.1",
        "prometheus-client>=0.17",
        "orjson>=3.9",  # JSON-RPC codec: several times faster than json on small messages
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.2",
            "trustme>=1.1",
            "websockets>=12",
            "eth-account>=0.11",
            "ecdsa>=0.19",
            "hypothesis>=6",
            "stripe>=7",  # its own signer (WebhookSignature.generate_signature_header) signs test webhooks
            "jsonschema>=4.18",
            "psutil>=5.9",  # which server process holds which connection (--processes)
        ],
        # Only for bench/ (the benchmark against peers): load generator, process stats, profiler.
        "bench": [
            "websockets>=12",
            "psutil>=5.9",
            "py-spy>=0.3.14",
        ],
    },
    classifiers=["Framework :: Twisted", "Programming Language :: Python :: 3"],
)
