"""ncpipe: reproduce 'On the Robustness of Neural Collapse and the Neural Collapse of Robustness'."""

__version__ = "0.1.0"
