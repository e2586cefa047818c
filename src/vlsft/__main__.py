from vlsft.cli import main

main()
