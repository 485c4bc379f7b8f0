"""`fedtune run`: Flower's simulation engine on a local Ray instance (the driver), and the
worker warm-up that pre-imports the client code."""
