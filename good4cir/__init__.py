"""good4cir: the command-line entry point. The work lives in store/, pipeline/,
retrieval/ and ui/; this package only parses arguments and calls them."""

__version__ = "0.1.0"
