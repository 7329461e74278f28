from benchmarks.chaos.run import main

raise SystemExit(main())
