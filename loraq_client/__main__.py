from loraq_client.cli import main

main()
