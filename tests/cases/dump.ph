# The dump extension: a query answered in pages of --max-results entries, for exports.
@args --max-results 2
C: add alias=ann name="Ann A"
S: 200:Ok.
C: add alias=bob name="Bob B"
S: 200:Ok.
C: add alias=cat name="Cat C"
S: 200:Ok.
C: add hostname=nas
S: 200:Ok.
# query stops at --max-results; dump pages through the whole answer, numbered throughout
C: query type=person
S: 502:Too many entries to print.
C: dump type=person return alias
S: 102:There were 3 matches to your request.
S: -200:1:    alias: ann
S: -200:2:    alias: bob
S: 200:Ok.
C: dump
S: 102:There were 3 matches to your request.
S: -200:3:    alias: cat
S: 200:Ok.
C: dump
S: 501:No matches to your query.
C: dump
S: 501:No matches to your query.
# no key needed; the client's id narrows the type as for query
C: id mdb
S: 200:Thanks.
C: dump notes=* return hostname
S: 501:No matches to your query.
C: dump type=* return hostname
S: 102:There was 1 match to your request.
S: -200:1: hostname: nas
S: 200:Ok.
C: dump shoe=9
S: -507:shoe:unknown field.
S: 500:Did not understand query.
