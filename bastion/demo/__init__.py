"""`bastion demo`: a newcomer's first five minutes, with nothing but the package and no network.

It plays a small support desk on 127.0.0.1: fake upstreams (`upstreams`), a real `bastion serve` with the demo
policy `rules/examples/demo.yaml` (`runner`), and scripted agents whose calls show each capability in turn
(`scenario`). `commands` registers the subcommand.
"""
