"""functional_meta: exact second-order MAML and Prototypical Networks over explicit weight lists."""

__version__ = "0.1.0"
