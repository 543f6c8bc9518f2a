import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the helper modules below, however pytest imports us

pytest_plugins = ["redis_server"]
