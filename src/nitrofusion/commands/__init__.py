"""One module per `nitrofusion` command; cli.py only parses the command line and calls them."""
