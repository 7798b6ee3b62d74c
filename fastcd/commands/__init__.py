"""One module per `fastcd` subcommand."""
