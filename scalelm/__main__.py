from scalelm.cli import main
from scalelm.data.workers import preload_workers

preload_workers()
raise SystemExit(main())
