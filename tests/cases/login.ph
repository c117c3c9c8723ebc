# login/answer/clear/logout: the qi exchange (the SSH signature method arrives separately).
C: logout
S: 500:Not logged in.
C: logout now
S: 599:argument given on logout command.
C: answer abc
S: 599:answer:there is no outstanding login.
C: clear secret
S: 599:clear:there is no outstanding login.
C: email me
S: 599:email:there is no outstanding login.
C: login
S: 599:login:no name given.
C: login a b
S: 599:login:extra arguments.
C: login j-smith
S~ 301:[!-9;-`]{42}
C: answer
S: 599:answer:no argument given.
C: login j-smith
S: -523:Expecting answer, clear, or email; login discarded.
S~ 301:[!-9;-`]{42}
C: status
S: -523:Expecting answer, clear, or email; login discarded.
S: 200:Database ready.
C: answer abc
S: 599:answer:there is no outstanding login.
C: login j-smith
S~ 301:[!-9;-`]{42}
C: clear secret
S: 599:clear:Not allowed for challenge type(s) 0x400.
C: login j-smith
S~ 301:[!-9;-`]{42}
C: answer not-a-signature
S: 500:Login failed.
C: xlogin 8 j-smith
S: 529:xlogin:Authentication method 8 unavailable.
C: klogin j-smith
S: 529:klogin:Authentication method 8 unavailable.
C: quit
S: 200:Bye!
CLOSED
