-------------------------- MODULE DistributedWalrus --------------------------
(***************************************************************************)
(* Walrus cluster: one topic's chain of segments, each with a replica set, *)
(* a leader appending under a time-bounded lease, quorum replication,      *)
(* rollover by entry count, failover of a segment whose leader is gone,    *)
(* crashes and message loss, and the shared read cursor.                   *)
(*                                                                         *)
(* Written for walrus; the Rust state machines in walrus-core implement    *)
(* these actions and the stateright models in this crate check the same    *)
(* invariants against the real code.                                       *)
(***************************************************************************)
EXTENDS Naturals, Sequences, FiniteSets

CONSTANTS
    Nodes,              \* e.g. {n1, n2, n3}
    MaxEntries,         \* rollover limit per segment (WALRUS_MAX_SEGMENT_ENTRIES)
    MaxSegments,        \* bound on the chain length
    MaxTime,            \* bound on the clock
    LeaseDuration,      \* lease length in ticks
    Drift,              \* clock drift margin in ticks
    DetectionTimeout,   \* ticks after the last grant before a successor may be chosen
    MaxCrashes,         \* crashes allowed (a minority)
    MaxLoss             \* messages the network may lose

ASSUME LeaseDuration + Drift < DetectionTimeout   \* lease expires before a successor
ASSUME 2 * MaxCrashes < Cardinality(Nodes)        \* only a minority crashes

Segs == 1..MaxSegments
NoNode == CHOOSE x : x \notin Nodes
Majority(S) == {Q \in SUBSET S : 2 * Cardinality(Q) > Cardinality(S)}
Max(S) == CHOOSE x \in S : \A y \in S : y <= x
\* Round-robin: the smallest node "after" n in a fixed order, over live nodes.
Order == CHOOSE f \in [Nodes -> 1..Cardinality(Nodes)] :
            \A a, b \in Nodes : a # b => f[a] # f[b]
NextLive(n, live) ==
    LET after == {m \in live : Order[m] > Order[n]}
    IN IF after # {} THEN CHOOSE m \in after : \A k \in after : Order[m] <= Order[k]
       ELSE CHOOSE m \in live : \A k \in live : Order[m] <= Order[k]

VARIABLES
    now,        \* the (shared) clock; drift is covered by the ASSUME above
    seg,        \* seg[s] = [state, leader, replicas, epoch, count]
    log,        \* log[n][s]: durable entries of segment s on node n (entries are <<s, pos>>)
    epochOf,    \* epochOf[n][s]: the epoch replica n accepts for s (fencing raises it)
    leaseExp,   \* leaseExp[s]: holder-clock expiry of the current lease
    lastGrant,  \* lastGrant[s]: grantor time of the last grant
    alive, crashes,
    msgs,       \* in-flight appends [to, s, epoch, pos]
    loss,
    acked,      \* entries acknowledged to clients: <<s, pos>>
    cursor      \* shared GET cursor: <<segment, position>> of the next entry

vars == <<now, seg, log, epochOf, leaseExp, lastGrant, alive, crashes, msgs, loss,
          acked, cursor>>

Len0(n, s) == Len(log[n][s])
Leader(s) == seg[s].leader
IsOpen(s) == seg[s].state = "open"
\* Entries durably on a majority of the replica set: committed.
Committed(s) ==
    { p \in 1..MaxEntries :
        \E Q \in Majority(seg[s].replicas) : \A q \in Q : Len0(q, s) >= p }
CommitLen(s) == IF Committed(s) = {} THEN 0 ELSE Max(Committed(s))
\* Readable end of a segment: sealed count, or the committed length of the open one.
ReadEnd(s) == IF seg[s].state = "sealed" THEN seg[s].count
              ELSE IF IsOpen(s) THEN CommitLen(s) ELSE 0

Init ==
    LET l == CHOOSE m \in Nodes : Order[m] = 1 IN
    /\ now = 0
    /\ seg = [s \in Segs |->
                IF s = 1 THEN [state |-> "open", leader |-> l, replicas |-> Nodes,
                               epoch |-> 0, count |-> 0]
                ELSE [state |-> "none", leader |-> NoNode, replicas |-> {},
                      epoch |-> 0, count |-> 0]]
    /\ log = [n \in Nodes |-> [s \in Segs |-> <<>>]]
    /\ epochOf = [n \in Nodes |-> [s \in Segs |-> 0]]
    /\ leaseExp = [s \in Segs |-> IF s = 1 THEN LeaseDuration ELSE 0]
    /\ lastGrant = [s \in Segs |-> 0]
    /\ alive = [n \in Nodes |-> TRUE]
    /\ crashes = 0
    /\ msgs = {}
    /\ loss = 0
    /\ acked = {}
    /\ cursor = <<1, 1>>

Live == {n \in Nodes : alive[n]}

\* The leader appends one entry, under its lease, while the rollover gate is open.
Append(s) ==
    /\ IsOpen(s) /\ alive[Leader(s)]
    /\ now < leaseExp[s]
    /\ epochOf[Leader(s)][s] = seg[s].epoch        \* not fenced
    /\ Len0(Leader(s), s) < MaxEntries              \* gate: the limit closes it
    /\ LET p == Len0(Leader(s), s) + 1 IN
       /\ log' = [log EXCEPT ![Leader(s)][s] = Append(@, <<s, p>>)]
       /\ msgs' = msgs \cup {[to |-> f, s |-> s, epoch |-> seg[s].epoch, pos |-> p]
                               : f \in seg[s].replicas \ {Leader(s)}}
    /\ UNCHANGED <<now, seg, epochOf, leaseExp, lastGrant, alive, crashes, loss, acked, cursor>>

\* A follower accepts only its current epoch and the next contiguous position (persist then
\* ack are one step here: the ack is what makes it count for Committed).
Receive(m) ==
    /\ m \in msgs /\ alive[m.to]
    /\ msgs' = msgs \ {m}
    /\ IF m.epoch = epochOf[m.to][m.s] /\ m.pos = Len0(m.to, m.s) + 1
       THEN log' = [log EXCEPT ![m.to][m.s] = Append(@, <<m.s, m.pos>>)]
       ELSE UNCHANGED log
    /\ UNCHANGED <<now, seg, epochOf, leaseExp, lastGrant, alive, crashes, loss, acked, cursor>>

\* The leader acknowledges committed entries (only while it leads that epoch).
Ack(s) ==
    /\ IsOpen(s) /\ alive[Leader(s)] /\ epochOf[Leader(s)][s] = seg[s].epoch
    /\ acked' = acked \cup {<<s, p>> : p \in Committed(s)}
    /\ acked' # acked
    /\ UNCHANGED <<now, seg, log, epochOf, leaseExp, lastGrant, alive, crashes, msgs, loss, cursor>>

OpenNext(s, from, count, newEpoch) ==
    /\ s + 1 \in Segs
    /\ LET l == NextLive(from, Live) IN
       seg' = [seg EXCEPT ![s] = [@ EXCEPT !.state = "sealed", !.count = count,
                                            !.epoch = newEpoch],
                          ![s + 1] = [state |-> "open", leader |-> l, replicas |-> Live,
                                      epoch |-> 0, count |-> 0]]
    /\ leaseExp' = [leaseExp EXCEPT ![s + 1] = now + LeaseDuration]
    /\ lastGrant' = [lastGrant EXCEPT ![s + 1] = now]

\* Conditional seal proposed by the leader once full and fully committed: exactly one per
\* segment because it names the open segment and its epoch.
Seal(s) ==
    /\ IsOpen(s) /\ alive[Leader(s)] /\ epochOf[Leader(s)][s] = seg[s].epoch
    /\ Len0(Leader(s), s) = MaxEntries
    /\ CommitLen(s) = MaxEntries
    /\ OpenNext(s, Leader(s), MaxEntries, seg[s].epoch)
    /\ UNCHANGED <<now, log, epochOf, alive, crashes, msgs, loss, acked, cursor>>

Renew(s) ==
    /\ IsOpen(s) /\ alive[Leader(s)] /\ epochOf[Leader(s)][s] = seg[s].epoch
    /\ now + LeaseDuration <= MaxTime
    /\ leaseExp' = [leaseExp EXCEPT ![s] = now + LeaseDuration]
    /\ lastGrant' = [lastGrant EXCEPT ![s] = now]
    /\ UNCHANGED <<now, seg, log, epochOf, alive, crashes, msgs, loss, acked, cursor>>

\* Failover: only after the detection timeout (so the lease has expired); fence a majority Q
\* of live replicas, bring Q to exactly the longest of their prefixes, seal there. One step:
\* the implementation (core::cluster::recovery) copies to a majority before the seal commits,
\* so no sealed entry is ever held by fewer replicas than this step leaves holding it.
Recover(s) ==
    /\ IsOpen(s)
    /\ now >= lastGrant[s] + DetectionTimeout
    /\ \E Q \in Majority(seg[s].replicas) :
         /\ \A q \in Q : alive[q]
         /\ LET len   == Max({Len0(q, s) : q \in Q})
                donor == CHOOSE q \in Q : Len0(q, s) = len
                e     == seg[s].epoch + 1
            IN /\ epochOf' = [n \in Nodes |-> [t \in Segs |->
                                 IF t = s /\ n \in Q THEN e ELSE epochOf[n][t]]]
               /\ log' = [n \in Nodes |-> [t \in Segs |->
                             IF t = s /\ n \in Q THEN log[donor][s] ELSE log[n][t]]]
               /\ OpenNext(s, Leader(s), len, e)
    /\ UNCHANGED <<now, alive, crashes, msgs, loss, acked, cursor>>

Crash(n) ==
    /\ alive[n] /\ crashes < MaxCrashes
    /\ alive' = [alive EXCEPT ![n] = FALSE]
    /\ crashes' = crashes + 1
    /\ UNCHANGED <<now, seg, log, epochOf, leaseExp, lastGrant, msgs, loss, acked, cursor>>

Lose(m) ==
    /\ m \in msgs /\ loss < MaxLoss
    /\ msgs' = msgs \ {m} /\ loss' = loss + 1
    /\ UNCHANGED <<now, seg, log, epochOf, leaseExp, lastGrant, alive, crashes, acked, cursor>>

\* Retransmission of what a live follower misses (the leader's Tick).
Resend(s, f) ==
    /\ IsOpen(s) /\ alive[Leader(s)] /\ f \in seg[s].replicas /\ alive[f]
    /\ Len0(f, s) < Len0(Leader(s), s)
    /\ LET m == [to |-> f, s |-> s, epoch |-> seg[s].epoch, pos |-> Len0(f, s) + 1] IN
       /\ m \notin msgs
       /\ msgs' = msgs \cup {m}
    /\ UNCHANGED <<now, seg, log, epochOf, leaseExp, lastGrant, alive, crashes, loss, acked, cursor>>

Tick ==
    /\ now < MaxTime
    /\ now' = now + 1
    /\ UNCHANGED <<seg, log, epochOf, leaseExp, lastGrant, alive, crashes, msgs, loss, acked, cursor>>

\* The shared cursor hands out the next readable entry, walking sealed segments in order.
Read ==
    LET s == cursor[1] p == cursor[2] IN
    /\ seg[s].state # "none"
    /\ IF p <= ReadEnd(s)
       THEN cursor' = <<s, p + 1>>
       ELSE /\ seg[s].state = "sealed" /\ p = seg[s].count + 1 /\ s + 1 \in Segs
            /\ cursor' = <<s + 1, 1>>
    /\ UNCHANGED <<now, seg, log, epochOf, leaseExp, lastGrant, alive, crashes, msgs, loss, acked>>

Next ==
    \/ \E s \in Segs : Append(s) \/ Ack(s) \/ Seal(s) \/ Renew(s) \/ Recover(s)
    \/ \E m \in msgs : Receive(m) \/ Lose(m)
    \/ \E s \in Segs, f \in Nodes : Resend(s, f)
    \/ \E n \in Nodes : Crash(n)
    \/ Tick \/ Read

\* Fairness on the individual actions the liveness properties need (WF on Next would not make
\* rollover or reads progress).
Fairness ==
    /\ \A s \in Segs : WF_vars(Seal(s)) /\ WF_vars(Recover(s)) /\ WF_vars(Ack(s))
    /\ \A s \in Segs, f \in Nodes : WF_vars(Resend(s, f))
    /\ \A m \in [to : Nodes, s : Segs, epoch : 0..MaxCrashes + MaxSegments, pos : 1..MaxEntries] :
           WF_vars(Receive(m))
    /\ WF_vars(Tick) /\ WF_vars(Read)

Spec == Init /\ [][Next]_vars /\ Fairness

StateConstraint == now <= MaxTime /\ Cardinality(msgs) <= 2 * Cardinality(Nodes)

---------------------------------------------------------------------------
\* Safety

TypeOK ==
    /\ \A s \in Segs : seg[s].state \in {"none", "open", "sealed"}
    /\ cursor[1] \in Segs

\* Segments open in chain order; at most one open segment; sealed ones precede it.
DomainConsistent ==
    /\ Cardinality({s \in Segs : IsOpen(s)}) <= 1
    /\ \A s \in Segs : s > 1 /\ seg[s].state # "none" => seg[s - 1].state = "sealed"

\* At most one writer per segment at any instant: a node that could Append is the leader
\* named by the segment, and no other segment's leader writes into it.
OneWriter ==
    \A s \in Segs :
        Cardinality({n \in Nodes : IsOpen(s) /\ n = Leader(s) /\ alive[n] /\ now < leaseExp[s]
                                   /\ epochOf[n][s] = seg[s].epoch}) <= 1

\* No writes after seal on fenced/sealed replicas: a fenced replica never holds more than the
\* seal.
NoWriteAfterSeal ==
    \A s \in Segs, n \in Nodes :
        seg[s].state = "sealed" /\ epochOf[n][s] = seg[s].epoch /\ seg[s].epoch > 0
            => Len0(n, s) = seg[s].count

\* Sealed counts equal the data of every replica that took part in sealing.
SealedCountsEqualData == NoWriteAfterSeal

\* Entries in a segment are in strict order (position i holds entry i).
StrictOrder ==
    \A n \in Nodes, s \in Segs : \A i \in 1..Len0(n, s) : log[n][s][i] = <<s, i>>

CursorInBounds ==
    /\ cursor[2] <= ReadEnd(cursor[1]) + 1
    /\ \A s \in Segs : s < cursor[1] => seg[s].state = "sealed"

\* No acknowledged entry is lost while only a minority crashes.
NoAckedLoss ==
    \A a \in acked : \E n \in Nodes : alive[n] /\ Len0(n, a[1]) >= a[2]

\* A sealed segment contains every acknowledged entry.
SealContainsAcked ==
    \A a \in acked : seg[a[1]].state = "sealed" => a[2] <= seg[a[1]].count

---------------------------------------------------------------------------
\* Liveness

OverfullEventuallySealed ==
    \A s \in Segs : (IsOpen(s) /\ Len0(Leader(s), s) = MaxEntries) ~> (seg[s].state = "sealed")

AvailableEventuallyRead ==
    \A s \in Segs : \A p \in 1..MaxEntries :
        (seg[s].state = "sealed" /\ p <= seg[s].count)
            ~> (cursor[1] > s \/ (cursor[1] = s /\ cursor[2] > p))

WritesResume ==
    \A s \in Segs : (IsOpen(s) /\ ~alive[Leader(s)] /\ s + 1 \in Segs)
        ~> (\E t \in Segs : IsOpen(t) /\ alive[Leader(t)])
=============================================================================
