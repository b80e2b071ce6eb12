from rlhf_zoo.cli import main

main()
