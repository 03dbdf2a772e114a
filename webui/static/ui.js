// Keyboard and quick view: "/" focuses the search box; on a result grid a thumbnail opens a lightbox that
// steps through the page's results with the left/right arrow keys and closes with Esc. GET forms leave
// fields at "any" out of the URL. Without JavaScript every link still leads to the tile page.
(function () {
  "use strict";

  function typing(target) {
    return target && (/^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName) || target.isContentEditable);
  }

  document.addEventListener("keydown", function (event) {
    if (event.key !== "/" || event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
    var search = document.querySelector("input[name=q]");
    if (!search) return;
    event.preventDefault();
    search.focus();
    search.select();
  });

  // Empty fields ("any") would put "case=&slide=" into every URL: leave them out of the submission.
  Array.prototype.forEach.call(document.querySelectorAll("form[method=get]"), function (form) {
    form.addEventListener("submit", function () {
      Array.prototype.forEach.call(form.elements, function (field) {
        if (field.name && field.name !== "q" && !field.disabled && field.value === "") {
          field.disabled = true;
          field.dataset.emptied = "1";
        }
      });
    });
  });
  // Back/forward restores the page from cache: give the emptied fields back.
  window.addEventListener("pageshow", function () {
    Array.prototype.forEach.call(document.querySelectorAll("[data-emptied]"), function (field) {
      field.disabled = false;
      delete field.dataset.emptied;
    });
  });

  // Filters with many values: the suggestions follow what is typed, from the server, with tile counts.
  Array.prototype.forEach.call(document.querySelectorAll("input[data-facet]"), function (field) {
    var list = document.getElementById(field.getAttribute("list"));
    var hint = field.parentNode.querySelector(".hint");
    var timer = null;
    field.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () {
        var url = "/api/facets/" + encodeURIComponent(field.dataset.facet) + "?limit=50&prefix=" +
          encodeURIComponent(field.value);
        fetch(url, {credentials: "same-origin"}).then(function (response) {
          return response.ok ? response.json() : null;
        }).then(function (facet) {
          if (!facet) return;
          list.textContent = "";
          facet.values.forEach(function (v) {
            var option = document.createElement("option");
            option.value = v.value;
            option.label = v.count + (v.count === 1 ? " tile" : " tiles");
            list.appendChild(option);
          });
          if (hint) {
            hint.textContent = facet.distinct > facet.values.length
              ? facet.values.length + " of " + facet.distinct + " shown: type to narrow"
              : facet.distinct + " matching";
          }
        });
      }, 200);
    });
  });

  var cards = Array.prototype.slice.call(document.querySelectorAll("article.card[data-image]"));
  if (!cards.length) return;

  var box = document.createElement("div");
  box.className = "lightbox";
  box.hidden = true;
  box.setAttribute("role", "dialog");
  box.setAttribute("aria-modal", "true");
  box.setAttribute("aria-label", "quick view");
  box.innerHTML =
    '<button type="button" class="lb-close secondary" aria-label="close (Esc)">×</button>' +
    '<button type="button" class="lb-prev secondary" aria-label="previous (←)">‹</button>' +
    '<figure><img alt=""><figcaption><div class="lb-title"></div><div class="lb-facts"></div>' +
    '<div class="lb-links"><a class="lb-tile">Tile page</a> <a class="lb-similar">Similar tiles</a></div>' +
    "</figcaption></figure>" +
    '<button type="button" class="lb-next secondary" aria-label="next (→)">›</button>';
  document.body.appendChild(box);
  var image = box.querySelector("img");
  var current = -1;
  var opener = null;

  function show(index) {
    current = (index + cards.length) % cards.length;
    var card = cards[current];
    image.src = card.dataset.image;
    image.alt = "tile " + card.dataset.tileId;
    box.querySelector(".lb-title").textContent = card.querySelector(".score .rank").textContent + " · " +
      card.querySelector(".score .label").textContent + " · " + (current + 1) + " of " + cards.length;
    var facts = box.querySelector(".lb-facts");
    facts.textContent = "";
    var all = card.querySelector("dl.all-facts") || card.querySelector("dl.facts");
    if (all) {
      var copy = all.cloneNode(true);
      copy.hidden = false;
      copy.className = "facts";
      facts.appendChild(copy);
    }
    box.querySelector(".lb-tile").href = card.querySelector("a.tile-link").href;
    box.querySelector(".lb-similar").href = card.querySelector("a.similar").href;
  }

  function open(index, from) {
    opener = from;
    box.hidden = false;
    document.body.classList.add("lightbox-open");
    show(index);
    box.querySelector(".lb-close").focus();
  }

  function close() {
    box.hidden = true;
    image.removeAttribute("src");
    document.body.classList.remove("lightbox-open");
    if (opener) opener.focus();
  }

  cards.forEach(function (card, index) {
    var link = card.querySelector("a.thumb-link");
    link.addEventListener("click", function (event) {
      if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
      event.preventDefault();
      open(index, link);
    });
  });
  box.querySelector(".lb-close").addEventListener("click", close);
  box.querySelector(".lb-prev").addEventListener("click", function () { show(current - 1); });
  box.querySelector(".lb-next").addEventListener("click", function () { show(current + 1); });
  box.addEventListener("click", function (event) {
    if (event.target === box) close();
  });
  document.addEventListener("keydown", function (event) {
    if (box.hidden) return;
    if (event.key === "Escape") {
      event.preventDefault();
      close();
    } else if (event.key === "ArrowLeft") {
      event.preventDefault();
      show(current - 1);
    } else if (event.key === "ArrowRight") {
      event.preventDefault();
      show(current + 1);
    }
  });
})();
