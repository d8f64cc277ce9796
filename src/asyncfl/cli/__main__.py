from asyncfl.cli.main import main

main()
