"""The core's own features, registered as plugins through the same hooks as third parties."""
