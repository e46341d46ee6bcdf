"""lungray: train, compare and run chest X-ray screening models at archive scale on Ray."""

__version__ = "0.1.0"
