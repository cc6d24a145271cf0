from pcigate.app import main

main()
