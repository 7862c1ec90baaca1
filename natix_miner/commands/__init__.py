"""One module per `natix-miner` subcommand, each with `add_parser(subparsers)` and `run(args)`."""
