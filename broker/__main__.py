"""`python -m broker`: the same as the `broker` command."""

from broker.cli.entry import main

main()
