"""`python -m appliance.cli`: the same as the `pacs-edge` console script."""

from appliance.cli.root import main

main()
