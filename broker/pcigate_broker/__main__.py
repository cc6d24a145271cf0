from pcigate_broker.cli import run

run()
