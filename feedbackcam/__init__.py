"""feedbackcam: correct an image classifier through its explanation, and make it learn from it."""

__version__ = "0.1.0"
