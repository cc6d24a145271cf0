from pcigate.entry import run

run()
