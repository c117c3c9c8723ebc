# merge is a write: the lab tier wants a writer's login for it, dry_run too.
@args --tier lab
C: merge source=scan hostname=lab-x ip=10.0.0.1
S: 506:You must be logged in to use this command.
C: merge source=scan dry_run hostname=lab-x ip=10.0.0.1
S: 506:You must be logged in to use this command.
C: query hostname=lab-x
S: 501:No matches to your query.
