"""circles: the WebSocket gateway of the Circles ecosystem."""

from .config import Config
from .service import CirclesService

__all__ = ["CirclesService", "Config"]
__version__ = "0.1.0"
