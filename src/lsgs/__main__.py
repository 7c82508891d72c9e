from lsgs.cli import main

main()
